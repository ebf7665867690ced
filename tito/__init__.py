"""tito: the TinyTorch command line (export, test, run, release, grade, bench)."""
