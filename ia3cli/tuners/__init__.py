"""What a run trains: IA3 (through PEFT), the baseline methods, and many IA3 adapters on one base."""
