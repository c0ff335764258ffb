"""The `vdvae` subcommands, a module per group; each has `add_commands(subparsers)`."""
