"""trtkit.graph"""
