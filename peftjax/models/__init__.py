"""Models: a BERT-family encoder/classifier with an exact HF importer, a Llama-family causal LM
(GGUF and HF importers), and small vision nets."""
from peftjax.models.barrier import grad_barrier
from peftjax.models.bert import BertClassifier
from peftjax.models.bert import BertConfig
from peftjax.models.bert import BertEncoder
from peftjax.models.bert import mean_pool
from peftjax.models.bert import sentence_embedding
from peftjax.models.build import Built
from peftjax.models.build import build
from peftjax.models.hf_bert import CheckpointError
from peftjax.models.hf_bert import load_bert
from peftjax.models.hf_bert import read_config
from peftjax.models.vision import CNN
from peftjax.models.vision import MLP
from peftjax.models.llama import LlamaConfig
from peftjax.models.llama import LlamaForCausalLM
from peftjax.models.llama import init_cache
from peftjax.models.lm_build import build_lm
from peftjax.models.lm_build import load_lm_tokenizer
from peftjax.models.gguf_file import load_gguf
from peftjax.models.gguf_file import smollm2_gguf
from peftjax.models.hf_llama import export_hf_dir
from peftjax.models.hf_llama import load_hf_dir
