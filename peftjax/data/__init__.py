"""Data: TFDS builders for the bundled offline data sets, tokenization, grain batch pipelines;
instruction and plain-text data for causal LMs (LMData, LMTokenizer)."""
from peftjax.data.assets import AssetNotFoundError
from peftjax.data.assets import find_package_file
from peftjax.data.assets import minilm_dir
from peftjax.data.builders import SPLIT_SEED
from peftjax.data.builders import Digits
from peftjax.data.builders import Mnist5k
from peftjax.data.builders import RottenTomatoes
from peftjax.data.builders import split_indices
from peftjax.data.pipeline import KNOWN
from peftjax.data.pipeline import Data
from peftjax.data.pipeline import DataError
from peftjax.data.pipeline import DataInfo
from peftjax.data.pipeline import build
from peftjax.data.pipeline import default_data_dir
from peftjax.data.pipeline import load_source
from peftjax.data.tokenize import Tokenizer
from peftjax.data.lm_pipeline import LMData
from peftjax.data.lm_pipeline import build_lm
from peftjax.data.lm_tokenizer import LMTokenizer
