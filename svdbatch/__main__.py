if __name__ == "__main__":
    # Imported here, not above: a spawned worker process imports this module as its
    # __main__ too, and needs nothing from the CLI (0.25 s saved in every worker start).
    from svdbatch.cli import main

    main()
