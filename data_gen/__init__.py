"""The data_gen stage (installed as selfjudge.data_gen)."""
