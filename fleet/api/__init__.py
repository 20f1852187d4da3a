"""The controller's HTTP surface: the operator API, the TUF endpoints, health and metrics."""
