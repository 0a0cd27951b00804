"""`petpipe serve`: a web page on 127.0.0.1 to try the model on photos, read the evaluation and clean labels
(fastai's ImageClassifierCleaner), its decisions saved to labels.corrections for index-labels to apply."""

from petpipe.serve.app import ServeSettings, create_app, listen, run_server

__all__ = ["ServeSettings", "create_app", "listen", "run_server"]
