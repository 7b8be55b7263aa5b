"""Developer tools: a headless app server and page screenshots."""
