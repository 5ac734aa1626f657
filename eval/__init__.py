"""The eval stage (installed as selfjudge.eval)."""
