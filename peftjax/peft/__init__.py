"""PEFT methods as functional transforms, selected by ``--config.peft.method``."""
from peftjax.peft import baselines  # registers 'full', 'linear_probe', 'bitfit'
from peftjax.peft import adapters  # registers 'adapter'
from peftjax.peft import ia3  # registers 'ia3'
from peftjax.peft import lora  # registers 'lora'
from peftjax.peft import prefix  # registers 'prefix'
from peftjax.peft import prompt  # registers 'prompt'
from peftjax.peft import lora_variants  # registers 'pissa', 'dora'
from peftjax.peft.base import Compose
from peftjax.peft.base import Method
from peftjax.peft.base import apply
from peftjax.peft.base import takes_deterministic
from peftjax.peft.base import build
from peftjax.peft.base import method_names
from peftjax.peft.base import register
from peftjax.peft.lora import LoRA
