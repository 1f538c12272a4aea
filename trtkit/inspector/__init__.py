"""trtkit.inspector"""
