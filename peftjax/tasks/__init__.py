"""Tasks: what a batch holds, the loss, the evaluation metrics and the summary of a run.

The loop (``peftjax/train.py``) is generic over the task selected by ``config.task``; a new task
is a new module plus one :func:`register` call (e.g. the causal language model).

>>> task = get(config)  # doctest: +SKIP
"""
from peftjax.tasks.base import Task
from peftjax.tasks.base import get
from peftjax.tasks.base import names
from peftjax.tasks.base import register
from peftjax.tasks import classification  # registers 'classification'
from peftjax.tasks import causal_lm  # registers 'causal_lm'
