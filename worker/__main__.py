from worker.cli import main

if __name__ == "__main__":  # not when a spawned rank process imports this module
    main()
