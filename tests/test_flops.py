"""The MFU FLOP count against its formula, worked by hand for a Llama-3-8B-shaped model."""

from mrl.train.flops import training_flops


def test_training_flops_per_token_llama3_8b():
    n, layers, hidden, seq = 8_030_261_248, 32, 4096, 4096
    per_token = 6 * n + 12 * layers * seq * hidden  # 48.18 GFLOP dense + 6.44 GFLOP attention
    assert training_flops(n, layers, hidden, seq, tokens=1) == per_token
    assert abs(per_token - 54.624e9) < 1e6
    assert training_flops(n, layers, hidden, seq, tokens=1000) == 1000 * per_token
