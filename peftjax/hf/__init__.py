"""Hugging Face interop: merged BERT exports and PEFT-format LoRA adapters (BERT, and
LlamaForCausalLM: peft_llama, peft_llama_import)."""
from peftjax.hf.bert_export import ExportError
from peftjax.hf.bert_export import export_bert
from peftjax.hf.bert_export import load_bert_classifier
from peftjax.hf.bert_export import to_hf_tensors
from peftjax.hf.bert_export import write_dir_atomic
from peftjax.hf.peft_import import load_peft_adapter
from peftjax.hf.peft_lora import PeftFormatError
from peftjax.hf.peft_lora import save_peft_adapter
from peftjax.hf.peft_lora import to_peft
from peftjax.hf.peft_llama import save_peft_llama
from peftjax.hf.peft_llama import to_peft_llama
from peftjax.hf.peft_llama_import import load_peft_llama
