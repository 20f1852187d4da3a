"""The controller's web dashboard (`/`): pages for operators, drawn on the server."""
