"""Throughput benchmarks: our engine, transformers and llama.cpp, each in its own process.

Above the API and the integrations (it drives all of them), below the command line.
"""
