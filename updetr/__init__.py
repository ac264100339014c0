"""updetr: UP-DETR (unsupervised pre-training of DETR by random query patch detection) as a platform."""
__version__ = "0.1.0"
