"""`python -m consumer` is `vercel-consumer`."""

from consumer.cli import main

if __name__ == "__main__":
    main()
