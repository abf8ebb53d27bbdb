"""opd_common: helpers both services (and the tests and benchmarks) may use, which are not the wire
client's business: the embedded default models (`embedded`) and starting a local teacher process
(`launch`). It imports neither service nor the wire client."""
