"""`python -m pam_jax.configs`: regenerate the preset JSON files from the code presets."""

from pam_jax.configs import write_all

for p in write_all():
    print(p)
