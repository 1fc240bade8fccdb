"""Prediction with the attribute: writing each case's attribute channel and running nnU-Net's predictor."""
