from ddscore_jax.cli.app import main

main()
