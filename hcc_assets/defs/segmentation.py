"""Segmentation and radiomics assets (liver_segmentation_model, liver_mask, radiomic_features)."""
