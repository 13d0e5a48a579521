"""Models: a BERT-family encoder/classifier with an exact HF importer, and small vision nets."""
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
