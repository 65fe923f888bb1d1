from micro_arch.cli import main

if __name__ == "__main__":
    main()
