"""The MFU FLOP count against its formula, worked by hand for a Llama-3-8B-shaped model."""

from mrl.model.config import ModelConfig
from mrl.train.flops import attention_width, training_flops


def test_training_flops_per_token_llama3_8b():
    n, layers, hidden, seq = 8_030_261_248, 32, 4096, 4096
    per_token = 6 * n + 12 * layers * seq * hidden  # 48.18 GFLOP dense + 6.44 GFLOP attention
    assert training_flops(n, layers, hidden, seq, tokens=1) == per_token
    assert abs(per_token - 54.624e9) < 1e6
    assert training_flops(n, layers, hidden, seq, tokens=1000) == 1000 * per_token


def test_attention_flops_use_heads_times_head_dim():
    """Qwen3-30B-A3B: 32 heads of 128 attend in 4096 dimensions, twice its hidden size of 2048."""
    qwen3 = ModelConfig(hidden_size=2048, num_attention_heads=32, head_dim=128)
    assert attention_width(qwen3) == 4096
    assert attention_width(ModelConfig(hidden_size=4096, num_attention_heads=32)) == 4096
    n, layers, seq = 30_532_122_624, 48, 4096
    assert training_flops(n, layers, attention_width(qwen3), seq, tokens=1) == 6 * n + 12 * layers * seq * 4096
