from trtkit.cli import entry

entry()
