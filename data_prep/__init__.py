"""data_prep: builds datasets in the shared layout (MSR-VTT from its public files, the synthetic benchmark)."""
