"""IBISAgent MONAI Label app."""
