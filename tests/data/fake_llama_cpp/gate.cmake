# With STEP_GATE set (a FIFO), this build step reads it first: it blocks until the test writes to it.
if(DEFINED ENV{STEP_GATE})
    execute_process(COMMAND cat "$ENV{STEP_GATE}")
endif()
file(WRITE ${OUT} "int fake_gate(void) { return 0; }\n")
