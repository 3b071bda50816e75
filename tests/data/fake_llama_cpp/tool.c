#include <stdio.h>
int fake_llama(void);
int main(void) { printf("fake tool: %d\n", fake_llama()); return 0; }
