"""Serving adapters: a library of named adapters over one base, batched multi-adapter inference,
weighted merges and export."""
from peftjax.serving.adapter import Adapter
from peftjax.serving.adapter import AdapterError
from peftjax.serving.library import AdapterLibrary
from peftjax.serving.merge import weighted
from peftjax.serving.stacked import Layout
from peftjax.serving.stacked import stacked_scope
