"""cxr-pneumonia: chest X-ray pneumonia classifier (research use only, not a medical device)."""

__version__ = "0.1.0"
