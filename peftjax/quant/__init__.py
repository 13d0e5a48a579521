"""int8 quantization: fake-quant ops, observers, QAT, PTQ, int8 inference, QLoRA."""
from peftjax.quant import int8
from peftjax.quant import observers
from peftjax.quant import ops
from peftjax.quant import qat
from peftjax.quant.int8 import Int8Model
from peftjax.quant.ops import check_bits
from peftjax.quant.ops import dequantize
from peftjax.quant.ops import fake_quant
from peftjax.quant.ops import fake_quant_minmax
from peftjax.quant.ops import lsq_fake_quant
from peftjax.quant.ops import quantize
from peftjax.quant.qat import Quantized
from peftjax.quant.qat import calibrate_ranges
from peftjax.quant.qat import wrap
