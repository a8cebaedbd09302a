"""deeplense-ray: GPU lens simulation, transformer training and tuning on Ray, tracked in MLflow."""

__version__ = "0.1.0"
