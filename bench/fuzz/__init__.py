"""Coverage-guided fuzzing of both engines' parsers (`make fuzz`; see bench/fuzz/README.md).

Each engine has one harness module whose `one_input(data)` turns fuzzer bytes into raw or
structured protocol streams, feeds them to the proxy's parsers in random chunkings and checks
that the parsers either refuse the input cleanly or report exactly what the stream holds.
The harnesses import no fuzzer, so the committed corpus also runs under pytest.
"""
