"""One module per `settler` command group; each exposes `register(subparsers)`."""
