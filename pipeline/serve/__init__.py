"""Serving: the registered model as an MLflow pyfunc that takes an image and returns its class map."""
