"""Serving adapters: a library of named adapters over one base, batched multi-adapter inference,
weighted merges and export; for causal LMs, many adapters generating in one batch
(:class:`LMAdapterLibrary`)."""
from peftjax.serving.adapter import Adapter
from peftjax.serving.adapter import AdapterError
from peftjax.serving.library import AdapterLibrary
from peftjax.serving.merge import weighted
from peftjax.serving.stacked import Layout
from peftjax.serving.stacked import stacked_scope
from peftjax.serving.lm_library import BASE
from peftjax.serving.lm_library import LMAdapter
from peftjax.serving.lm_library import LMAdapterLibrary
from peftjax.serving.lm_files import library_from_files as lm_library_from_files
