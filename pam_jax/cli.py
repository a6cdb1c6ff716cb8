"""The `pam-jax` command."""
import sys
def main(argv=None) -> int:
    print("pam-jax")
    return 0
