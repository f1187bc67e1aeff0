from mlecli._entry import main

if __name__ == "__main__":  # python -m mlecli; never on a mere import
    main()
