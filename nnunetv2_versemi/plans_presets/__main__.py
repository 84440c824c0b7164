from nnunetv2_versemi.plans_presets import main

main()
