"""trtkit.calibration"""
