"""Library of the IBISAgent MONAI Label app: the infer task, sessions and errors."""
