"""Generation for causal LMs: sampling rules and jitted prefill + KV-cache decode.

Shared by evaluation (exact-match tasks), ``python -m peftjax.generate`` and serving.

>>> from peftjax import generation
>>> out = generation.generate(step, make_cache, ids, lengths, max_new_tokens=32)  # doctest: +SKIP
"""
from peftjax.generation.decode import COMPILES
from peftjax.generation.decode import Generation
from peftjax.generation.decode import GenerationError
from peftjax.generation.decode import batch_bucket
from peftjax.generation.decode import cache_batch_axes
from peftjax.generation.decode import compile_count
from peftjax.generation.decode import generate
from peftjax.generation.decode import length_bucket
from peftjax.generation.decode import method_cache
from peftjax.generation.decode import method_prefix
from peftjax.generation.decode import method_step
from peftjax.generation.decode import model_step
from peftjax.generation.decode import shared_prefix
from peftjax.generation.decode import stream
from peftjax.generation.sampling import GREEDY
from peftjax.generation.sampling import SamplingConfig
from peftjax.generation.sampling import SamplingError
from peftjax.generation.sampling import filtered_logits
from peftjax.generation.sampling import greedy
from peftjax.generation.sampling import sample
from peftjax.generation.sampling import top_k_mask
from peftjax.generation.sampling import top_p_mask
