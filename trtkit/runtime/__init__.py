"""trtkit.runtime"""
