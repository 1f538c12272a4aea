"""trtkit.builder"""
