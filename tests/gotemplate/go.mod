module gptoss.test/gotemplate

go 1.19
