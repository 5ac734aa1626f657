"""The train stage (installed as selfjudge.train)."""
