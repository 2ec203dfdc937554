#pragma once
// The `moeforge` command line: subcommands `train` (and `config-doc`). Owns the MPI lifetime.
//
// Error handling: everything that can be checked locally (CLI, config, data files) is checked
// on every rank first; the ranks then agree (one all-reduce) and, if any failed, the lowest
// failing rank prints its message once and all exit non-zero — no rank is left in a collective.
// A failure after that point (inside collectives) prints the message and aborts the whole job
// (MPI_Abort), so no rank hangs.
namespace moeforge {

int run_cli(int argc, char** argv);

}  // namespace moeforge
