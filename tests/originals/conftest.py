"""Other libraries' own test files, vendored unmodified; never collected by fastvq's suite (their tests import
the original library). tests/nn/test_vqp_suite.py runs vector-quantize-pytorch's in a subprocess."""

collect_ignore_glob = ["*"]
