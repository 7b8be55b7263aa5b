"""Developer tools.

    serve        `streamlit run app.py` headless on a free port (browser tests, benchmarks)
    screenshots  every page of every bundled model, and a new user's walk with bad input
"""
